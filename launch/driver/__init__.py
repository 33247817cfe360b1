"""What the training driver is made of: no entry point lives here (those are ``launch/*.py``)."""
