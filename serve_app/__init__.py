"""Ray Serve: request/response schemas, the retriever, the retrieval deployment and builder."""
