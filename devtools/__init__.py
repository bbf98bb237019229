"""Development tools, apart from the service: the sample input builder and a storage SCP."""
