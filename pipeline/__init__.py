"""Data contracts and Ray Data IO: config, fitted state, pure transforms, prepare."""
