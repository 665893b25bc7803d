/*
 * twistsock's load generator: compiled, single-threaded, epoll, so that on a
 * 2-core machine it is not the bottleneck of the server it measures.
 *
 *   loadgen pingpong HOST PORT CONNS SIZE SECONDS   each connection keeps one SIZE-byte message
 *                                                   in flight and waits for all of it back
 *   loadgen connect  HOST PORT PARALLEL SECONDS     connect, send "hello\n", read the reply line, close
 *   loadgen bulk     HOST PORT SECONDS              one connection, send and receive as fast as possible
 *   loadgen udp      HOST PORT SOCKETS SIZE SECONDS each connected socket keeps one datagram in flight
 *   loadgen idle     HOST PORT COUNT                open COUNT connections, print "ready", hold them
 *                                                   until standard input closes
 *
 * Prints one JSON object. Every reply is checked byte for byte; a wrong one
 * is counted in "errors". Loopback only: HOST must be an IPv4 or IPv6 literal.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "target.h"

static void die(const char *what) {
    perror(what);
    exit(2);
}

static int open_socket(int type, int blocking) {
    int fd = socket(target.ss_family, type | (blocking ? 0 : SOCK_NONBLOCK), 0);
    if (fd < 0) die("socket");
    if (type == SOCK_STREAM) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    if (connect(fd, (struct sockaddr *)&target, targetLen) < 0 && errno != EINPROGRESS) die("connect");
    return fd;
}

static unsigned char *pattern(size_t size) {
    unsigned char *p = malloc(size ? size : 1);
    for (size_t i = 0; i < size; i++) p[i] = (unsigned char)(i * 7 + 13);
    return p;
}

/* ---- pingpong: CONNS connections, one message in flight each ---- */

typedef struct {
    int fd;
    size_t sent, got;
} Conn;

static int pingpong(int conns, size_t size, double seconds) {
    unsigned char *msg = pattern(size), *buf = malloc(size > 65536 ? size : 65536);
    int ep = epoll_create1(0);
    Conn *c = calloc(conns, sizeof *c);
    for (int i = 0; i < conns; i++) {
        c[i].fd = open_socket(SOCK_STREAM, 0);
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c[i].fd, &ev);
    }
    long done = 0, errors = 0;
    double start = now(), end = start + seconds;
    struct epoll_event events[256];
    while (now() < end) {
        int n = epoll_wait(ep, events, 256, 100);
        for (int e = 0; e < n; e++) {
            Conn *k = &c[events[e].data.u32];
            if ((events[e].events & EPOLLOUT) && k->sent < size) {
                ssize_t w = send(k->fd, msg + k->sent, size - k->sent, MSG_NOSIGNAL);
                if (w > 0) k->sent += w;
                if (k->sent == size) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = events[e].data.u32};
                    epoll_ctl(ep, EPOLL_CTL_MOD, k->fd, &ev);
                }
            }
            if (events[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                for (;;) {
                    ssize_t r = recv(k->fd, buf, size - k->got, 0);
                    if (r > 0) {
                        if (memcmp(buf, msg + k->got, r) != 0) errors++;
                        k->got += r;
                        if (k->got < size) continue;
                        done++;
                        k->sent = k->got = 0;
                        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = events[e].data.u32};
                        epoll_ctl(ep, EPOLL_CTL_MOD, k->fd, &ev);
                        break;
                    }
                    if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                        fprintf(stderr, "loadgen: connection lost\n");
                        exit(3);
                    }
                    break;
                }
            }
        }
    }
    double elapsed = now() - start;
    printf("{\"mode\": \"pingpong\", \"requests\": %ld, \"seconds\": %.3f, \"rate\": %.1f, \"errors\": %ld}\n", done, elapsed, done / elapsed, errors);
    return errors ? 1 : 0;
}

/* ---- connect: a new connection per line ---- */

typedef struct {
    int fd, state; /* 0 connecting/sending, 1 reading */
    char reply[64];
    size_t got;
} Slot;

static void slot_open(int ep, Slot *s, int index) {
    s->fd = open_socket(SOCK_STREAM, 0);
    s->state = 0;
    s->got = 0;
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = index};
    epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
}

static int connect_rate(int parallel, double seconds) {
    static const char line[] = "hello\n", expected[] = "HELLO\n";
    int ep = epoll_create1(0);
    Slot *s = calloc(parallel, sizeof *s);
    for (int i = 0; i < parallel; i++) slot_open(ep, &s[i], i);
    long done = 0, errors = 0;
    double start = now(), end = start + seconds;
    struct epoll_event events[256];
    while (now() < end) {
        int n = epoll_wait(ep, events, 256, 100);
        for (int e = 0; e < n; e++) {
            int i = events[e].data.u32;
            Slot *k = &s[i];
            if (k->state == 0) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(k->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || send(k->fd, line, 6, MSG_NOSIGNAL) != 6) {
                    errors++;
                } else {
                    k->state = 1;
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
                    epoll_ctl(ep, EPOLL_CTL_MOD, k->fd, &ev);
                    continue;
                }
            } else {
                ssize_t r = recv(k->fd, k->reply + k->got, sizeof k->reply - k->got, 0);
                if (r > 0) {
                    k->got += r;
                    if (k->got < 6) continue;
                    if (memcmp(k->reply, expected, 6) == 0) done++; else errors++;
                } else if (r < 0 && errno == EAGAIN) {
                    continue;
                } else {
                    errors++;
                }
            }
            close(k->fd);
            slot_open(ep, k, i);
        }
    }
    double elapsed = now() - start;
    printf("{\"mode\": \"connect\", \"requests\": %ld, \"seconds\": %.3f, \"rate\": %.1f, \"errors\": %ld}\n", done, elapsed, done / elapsed, errors);
    return errors > done / 100 ? 1 : 0;
}

/* ---- bulk: one connection, both directions at full speed ---- */

static int bulk(double seconds) {
    size_t size = 256 * 1024;
    unsigned char *out = pattern(size), *in = malloc(size);
    int fd = open_socket(SOCK_STREAM, 0);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = 0};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    unsigned long long sent = 0, got = 0, errors = 0;
    double start = now(), end = start + seconds;
    struct epoll_event events[4];
    while (now() < end) {
        int n = epoll_wait(ep, events, 4, 100);
        for (int e = 0; e < n; e++) {
            if (events[e].events & EPOLLOUT) {
                size_t offset = sent % size;
                ssize_t w = send(fd, out + offset, size - offset, MSG_NOSIGNAL);
                if (w > 0) sent += w;
            }
            if (events[e].events & EPOLLIN) {
                size_t offset = got % size;
                ssize_t r = recv(fd, in, size - offset, 0);
                if (r > 0) {
                    if (memcmp(in, out + offset, r) != 0) errors++;
                    got += r;
                } else if (r == 0) {
                    fprintf(stderr, "loadgen: connection closed\n");
                    exit(3);
                }
            }
        }
    }
    double elapsed = now() - start;
    printf("{\"mode\": \"bulk\", \"bytes\": %llu, \"seconds\": %.3f, \"rate\": %.1f, \"errors\": %llu}\n", got, elapsed, got / elapsed / 1e6, errors);
    return errors ? 1 : 0;
}

/* ---- udp: connected sockets, one datagram in flight each ---- */

static int udp(int sockets, size_t size, double seconds) {
    unsigned char *msg = pattern(size), *buf = malloc(size + 1);
    int ep = epoll_create1(0);
    int *fd = calloc(sockets, sizeof *fd);
    double *sentAt = calloc(sockets, sizeof *sentAt);
    for (int i = 0; i < sockets; i++) {
        fd[i] = open_socket(SOCK_DGRAM, 0);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd[i], &ev);
        send(fd[i], msg, size, 0);
        sentAt[i] = now();
    }
    long done = 0, errors = 0, lost = 0;
    double start = now(), end = start + seconds;
    struct epoll_event events[256];
    while (now() < end) {
        int n = epoll_wait(ep, events, 256, 20);
        double t = now();
        for (int e = 0; e < n; e++) {
            int i = events[e].data.u32;
            ssize_t r = recv(fd[i], buf, size + 1, 0);
            if (r < 0) continue;
            if ((size_t)r != size || memcmp(buf, msg, size) != 0) errors++; else done++;
            send(fd[i], msg, size, 0);
            sentAt[i] = t;
        }
        for (int i = 0; i < sockets; i++) {
            if (t - sentAt[i] > 0.2) { /* lost: send again */
                lost++;
                send(fd[i], msg, size, 0);
                sentAt[i] = t;
            }
        }
    }
    double elapsed = now() - start;
    printf("{\"mode\": \"udp\", \"requests\": %ld, \"seconds\": %.3f, \"rate\": %.1f, \"errors\": %ld, \"lost\": %ld}\n", done, elapsed, done / elapsed, errors, lost);
    return errors ? 1 : 0;
}

/* ---- idle: hold COUNT connections ---- */

static int idle(int count) {
    int *fd = calloc(count, sizeof *fd);
    for (int i = 0; i < count; i++) fd[i] = open_socket(SOCK_STREAM, 1);
    printf("ready %d\n", count);
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0) {
    }
    for (int i = 0; i < count; i++) close(fd[i]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: loadgen pingpong|connect|bulk|udp|idle HOST PORT ...\n");
        return 2;
    }
    resolve(argv[2], atoi(argv[3]));
    const char *mode = argv[1];
    if (!strcmp(mode, "pingpong") && argc == 7) return pingpong(atoi(argv[4]), atol(argv[5]), atof(argv[6]));
    if (!strcmp(mode, "connect") && argc == 6) return connect_rate(atoi(argv[4]), atof(argv[5]));
    if (!strcmp(mode, "bulk") && argc == 5) return bulk(atof(argv[4]));
    if (!strcmp(mode, "udp") && argc == 7) return udp(atoi(argv[4]), atol(argv[5]), atof(argv[6]));
    if (!strcmp(mode, "idle") && argc == 5) return idle(atoi(argv[4]));
    fprintf(stderr, "loadgen: bad arguments for %s\n", mode);
    return 2;
}
