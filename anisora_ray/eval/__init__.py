"""Held-out evaluation of the generator and the statistics that say whether a round helped."""
