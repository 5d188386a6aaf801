"""s2bnn.nn"""
