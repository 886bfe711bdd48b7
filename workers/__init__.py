"""The worker side: start-up (device, model load), the batching consumer and persistence."""
