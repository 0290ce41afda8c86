"""The broker: Channels consumers, forwarding, load balancing, registry and history."""
