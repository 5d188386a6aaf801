"""s2bnn.methods"""
