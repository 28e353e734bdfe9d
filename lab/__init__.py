"""The lab: the whole system on one machine, on loopback."""
