"""Admin surface of the node: REST API, web page, Prometheus metrics and the read-side queries the CLI shares.

``create_app(settings, db, actions)`` (api.py) builds the FastAPI application; ``HttpService`` (service.py) runs it
with uvicorn in a thread of ``dicom-node serve``. Everything reads the job database, so one process can serve the
state of every worker that writes to the same database.
"""
