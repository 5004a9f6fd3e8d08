"""Graph machinery: normalisation, the matcher, rewriting and the capture backend.
Knows no pattern: the list of patterns is handed to it."""
