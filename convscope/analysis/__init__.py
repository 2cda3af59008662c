"""Measurements built on the methods: invariance curves (Zeiler & Fergus Fig. 5), part
correspondence (§4.3, Table 1) and explanation quality (deletion/insertion, cascading
randomisation). Pure functions returning frozen dataclasses of CPU tensors; no file I/O."""
