from intervals.ops import merge, total_length
