"""s2bnn.data"""
