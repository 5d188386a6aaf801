from s2bnn.cli import main

raise SystemExit(main())
