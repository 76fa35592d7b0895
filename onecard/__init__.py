"""onecard: the back office of a stored-value transport card."""
