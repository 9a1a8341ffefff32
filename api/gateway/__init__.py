"""The OpenAI-compatible gateway (data plane); see `api.gateway.app`."""
