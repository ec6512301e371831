"""The HTTP gateway and engine of rfserve."""
