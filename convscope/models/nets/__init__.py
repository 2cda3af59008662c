"""Network definitions (need torch); the registry rows that build them live one folder up."""
