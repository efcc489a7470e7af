"""The approval service: the operator approves benchmarks; owners ask, and benchmark owners consent to, associations."""
