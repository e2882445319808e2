"""Remote delivery: smtproutes, MX lookup, tcpto, and the asyncio SMTP delivery agent."""
