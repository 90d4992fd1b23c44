"""Training the VAP expert: objectives, optimizer, the jitted step, metrics and the loop."""
