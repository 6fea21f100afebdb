"""The editing stage: targeted low-rank updates to located recall circuits."""
