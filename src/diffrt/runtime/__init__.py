"""The sampling runtime: DDIM math, guidance, backends and the pipeline that ties them."""
