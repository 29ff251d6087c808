"""In-band failure detection: process supervision, leases, exception capture, statistical monitoring."""
