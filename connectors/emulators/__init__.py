"""Protocol-faithful EDC emulators (FastAPI apps on loopback) for tests, benchmarks and demos."""
