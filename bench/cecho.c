/*
 * A minimal epoll echo server in C: the practical limit the benchmark
 * compares against. TCP echo with backpressure (stops reading while a
 * connection's echo is unsent) and UDP echo, on one port of 127.0.0.1.
 *
 *   cecho PORT       (prints "listening PORT" once ready; PORT 0 picks one)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536

typedef struct {
    int fd;
    size_t pending, offset;
    char buf[BUF];
} Conn;

int main(int argc, char **argv) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(argc > 1 ? atoi(argv[1]) : 0)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1;
    int tcp = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(tcp, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(tcp, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(tcp, 4096) < 0) {
        perror("tcp");
        return 1;
    }
    socklen_t len = sizeof addr;
    getsockname(tcp, (struct sockaddr *)&addr, &len);
    int udp = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (bind(udp, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("udp");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, tcp, &ev);
    static int udpMarker;
    ev.data.ptr = &udpMarker;
    epoll_ctl(ep, EPOLL_CTL_ADD, udp, &ev);
    printf("listening %d\n", ntohs(addr.sin_port));
    fflush(stdout);

    static char dgram[65536];
    struct epoll_event events[512];
    for (;;) {
        int n = epoll_wait(ep, events, 512, -1);
        for (int e = 0; e < n; e++) {
            void *p = events[e].data.ptr;
            if (p == NULL) {
                int fd;
                while ((fd = accept4(tcp, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    Conn *c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            if (p == &udpMarker) {
                for (;;) {
                    struct sockaddr_storage from;
                    socklen_t fromLen = sizeof from;
                    ssize_t r = recvfrom(udp, dgram, sizeof dgram, 0, (struct sockaddr *)&from, &fromLen);
                    if (r < 0) break;
                    sendto(udp, dgram, r, 0, (struct sockaddr *)&from, fromLen);
                }
                continue;
            }
            Conn *c = p;
            if (c->pending) { /* writable again: flush what is left */
                ssize_t w = send(c->fd, c->buf + c->offset, c->pending, MSG_NOSIGNAL);
                if (w > 0) {
                    c->offset += w;
                    c->pending -= w;
                } else if (errno != EAGAIN) {
                    goto closeIt;
                }
                if (!c->pending) {
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
                }
                continue;
            }
            ssize_t r = recv(c->fd, c->buf, BUF, 0);
            if (r == 0 || (r < 0 && errno != EAGAIN)) goto closeIt;
            if (r < 0) continue;
            ssize_t w = send(c->fd, c->buf, r, MSG_NOSIGNAL);
            if (w < 0 && errno != EAGAIN) goto closeIt;
            if (w < r) { /* stop reading until the rest is sent */
                c->offset = w > 0 ? w : 0;
                c->pending = r - c->offset;
                struct epoll_event cev = {.events = EPOLLOUT, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
            }
            continue;
        closeIt:
            close(c->fd);
            free(c);
        }
    }
}
