"""Framework integrations (Django, Flask, Pyramid, WSGI, jobs, logging): one module each."""
