"""Fakes that sit at process boundaries: servers the code under test talks to over real sockets."""
