"""The edges: the two sockets (frames in, frames out, admission) and their routing."""
