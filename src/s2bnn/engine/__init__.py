"""s2bnn.engine"""
