"""Training jobs: HAM10000 -> lesion-grouped folds -> CNN -> boosters -> stack -> model bundle."""
