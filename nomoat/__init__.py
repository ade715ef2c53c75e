"""nomoat: build your own language model end to end."""
