"""Grounding answers: the parser, the metrics and the HTML report."""
