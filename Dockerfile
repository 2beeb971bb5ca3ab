# Placeholder until the deploy issue: a CPU image that installs dgserve.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY engine ./engine
COPY models ./models
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir .
ENTRYPOINT ["dgserve"]
CMD ["--help"]
