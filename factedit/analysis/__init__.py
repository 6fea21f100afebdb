"""Analysis (locate): where a model retrieves a fact."""
