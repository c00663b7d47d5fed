"""Decoding: sampling, the eager reference loops (`loops`: standard and recycle; `speculative`: the lossless
strategies and their drafters), the acceptance rules (`verify`), top-k selection without sorts (`topk`), the strategy
registry (`strategies`) and the engines that run every strategy as fixed-shape steps (`engine`)."""
