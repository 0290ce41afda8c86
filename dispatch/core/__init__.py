"""What happens to requests and workers: the request table and its driver, worker links,
balancing, liveness."""
