"""Channel adapters: thin layers that turn a transport's request into a gate call."""
