"""Real servers and image builders shared by the test suite."""
