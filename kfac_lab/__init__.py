"""kfac_lab."""
