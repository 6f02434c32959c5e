"""Images and audio as tokens of the one decoder (issue 16). The contract is spec.py."""
