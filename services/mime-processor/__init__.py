"""mime-processor: consumes mail.inbound.received, adds Authentication-Results for MX mail,
stores the final message in S3, computes its MessageSummary and routes every recipient
(mail.deliver.local, mail.outbound.queued, mail.events). Run: python -m postbus.mime_processor
"""
