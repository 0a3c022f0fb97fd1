"""Studies: experiments that produce a committed results page (docs/results/)."""
