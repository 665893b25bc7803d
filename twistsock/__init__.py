"""twistsock: the classic socket client/server programs, done right on Twisted.

The services live in L{twistsock.services}, the server in L{twistsock.tap}
(run as C{twist sockets}), and the client functions for scripts in
L{twistsock.client}.
"""

__version__ = "0.1.0"
