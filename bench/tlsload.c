/*
 * twistsock's TLS load generator: compiled, OpenSSL, one blocking thread per
 * connection (all pinned to one core by the harness).
 *
 *   tlsload pingpong  HOST PORT CONNS SIZE SECONDS   each connection keeps one SIZE-byte message
 *                                                    in flight and waits for all of it back
 *   tlsload handshake HOST PORT PARALLEL SECONDS     connect, full TLS handshake (no resumption),
 *                                                    send "hello\n", read it back, close
 *
 * The server's certificate is not verified (the cost measured is the
 * server's). Prints one JSON object; every reply is checked byte for byte and
 * a wrong one is counted in "errors". Build: cc -O2 tlsload.c -lssl -lcrypto -lpthread
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "target.h"

static SSL_CTX *ctx;
static double deadline;
static long size;
static atomic_long requests, errors;

static SSL *open_tls(void) {
    int fd = socket(target.ss_family, SOCK_STREAM, 0);
    if (fd < 0) return NULL;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&target, targetLen) < 0) {
        close(fd);
        return NULL;
    }
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1) {
        SSL_free(ssl);
        close(fd);
        return NULL;
    }
    return ssl;
}

static void close_tls(SSL *ssl) {
    int fd = SSL_get_fd(ssl);
    SSL_free(ssl);
    close(fd);
}

/* Write all of buf, then read exactly as many bytes back and compare. */
static int exchange(SSL *ssl, const unsigned char *buf, unsigned char *back, long n) {
    long done = 0;
    while (done < n) {
        int w = SSL_write(ssl, buf + done, (int)(n - done));
        if (w <= 0) return -1;
        done += w;
    }
    done = 0;
    while (done < n) {
        int r = SSL_read(ssl, back + done, (int)(n - done));
        if (r <= 0) return -1;
        done += r;
    }
    return memcmp(buf, back, n) ? 1 : 0;
}

static void *pingpong_thread(void *arg) {
    (void)arg;
    unsigned char *buf = malloc(size), *back = malloc(size);
    for (long i = 0; i < size; i++) buf[i] = (unsigned char)(i * 7 + 1);
    SSL *ssl = open_tls();
    if (!ssl) {
        atomic_fetch_add(&errors, 1);
        return NULL;
    }
    while (now() < deadline) {
        int r = exchange(ssl, buf, back, size);
        if (r < 0) {
            atomic_fetch_add(&errors, 1);
            break;
        }
        if (r) atomic_fetch_add(&errors, 1);
        else atomic_fetch_add(&requests, 1);
    }
    close_tls(ssl);
    free(buf);
    free(back);
    return NULL;
}

static void *handshake_thread(void *arg) {
    (void)arg;
    unsigned char back[6];
    while (now() < deadline) {
        SSL *ssl = open_tls();
        if (!ssl) {
            atomic_fetch_add(&errors, 1);
            continue;
        }
        int r = exchange(ssl, (const unsigned char *)"hello\n", back, 6);
        if (r) atomic_fetch_add(&errors, 1);
        else atomic_fetch_add(&requests, 1);
        SSL_shutdown(ssl);
        close_tls(ssl);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int threads;
    double seconds;
    void *(*run)(void *);
    if (argc == 7 && !strcmp(argv[1], "pingpong")) {
        threads = atoi(argv[4]);
        size = atol(argv[5]);
        seconds = atof(argv[6]);
        run = pingpong_thread;
    } else if (argc == 6 && !strcmp(argv[1], "handshake")) {
        threads = atoi(argv[4]);
        seconds = atof(argv[5]);
        run = handshake_thread;
    } else {
        fprintf(stderr, "usage: tlsload pingpong HOST PORT CONNS SIZE SECONDS | handshake HOST PORT PARALLEL SECONDS\n");
        return 2;
    }
    resolve(argv[2], atoi(argv[3]));
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    double start = now();
    deadline = start + seconds;
    pthread_t *ids = calloc(threads, sizeof *ids);
    for (int i = 0; i < threads; i++) pthread_create(&ids[i], NULL, run, NULL);
    for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
    double elapsed = now() - start;
    printf("{\"mode\": \"tls-%s\", \"requests\": %ld, \"seconds\": %.3f, \"rate\": %.1f, \"errors\": %ld}\n", argv[1],
           atomic_load(&requests), elapsed, atomic_load(&requests) / elapsed, atomic_load(&errors));
    return atomic_load(&errors) ? 1 : 0;
}
