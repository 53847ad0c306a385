"""The course's benchmarks (``make bench``): each module one measurement, ``common`` what they share."""
