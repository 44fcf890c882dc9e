"""Local engines for development and the quickstart: a tiny chat model built on the spot and a
launcher for vLLM CPU engines (`bastion up`). Nothing here is on the production request path;
production engines are started by their own operators and reached through `bastion.engines`."""
