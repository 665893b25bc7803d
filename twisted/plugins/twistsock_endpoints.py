"""twistsock's endpoint types for every Twisted program: mtls: and proxy:."""

from twistsock.proxy import ProxyServerParser
from twistsock.tls import MutualTLSServerParser

twistsockMutualTLS = MutualTLSServerParser()
twistsockProxy = ProxyServerParser()
