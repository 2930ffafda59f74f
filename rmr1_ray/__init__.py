"""rmr1-ray: reasoning reward models (RM-R1) on Ray."""
