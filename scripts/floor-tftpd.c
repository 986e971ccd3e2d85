/*
 * The fastest lock-step TFTP server this host allows, as a benchmark floor: one transfer
 * at a time, the file mmap()ed, blksize honoured, no windowsize, no retransmission, no
 * logging. Per block it does exactly recv(ACK) + send(DATA) on a connected socket; a
 * lock-step fetch from it costs the client's and the kernel's share of every round trip
 * and nothing else. scripts/bench-tftp.sh runs it as server "floor" to show how much of a
 * lock-step fetch any server can still win. Not a server to use: it serves one file root,
 * trusts its clients and stops at the first error.
 *
 * usage: floor-tftpd ADDR ROOT   (listens on ADDR:69)
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static void serve(int listener, const char *root, unsigned char *req, ssize_t n,
                  struct sockaddr_in *peer) {
    char path[4096];
    const char *name = (const char *)req + 2;
    size_t blksize = 512;
    int want_oack = 0;
    const char *p = name + strlen(name) + 1;             /* mode */
    for (p += strlen(p) + 1; p < (const char *)req + n; p += strlen(p) + 1) {
        const char *v = p + strlen(p) + 1;
        if (v >= (const char *)req + n) break;
        if (!strcasecmp(p, "blksize")) { blksize = strtoul(v, NULL, 10); want_oack = 1; }
        p = v;
    }
    if (blksize < 8 || blksize > 65464) blksize = 512;
    snprintf(path, sizeof path, "%s/%s", root, name);
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) return;
    unsigned char *data = st.st_size ? mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    connect(s, (struct sockaddr *)peer, sizeof *peer);
    unsigned char pkt[65536 + 4], ack[516];
    size_t blocks = st.st_size / blksize + 1;
    if (want_oack) {
        int len = sprintf((char *)pkt + 2, "blksize%c%zu", 0, blksize) + 3;
        pkt[0] = 0; pkt[1] = 6;
        send(s, pkt, len, 0);
        recv(s, ack, sizeof ack, 0);
    }
    for (size_t b = 1; b <= blocks; b++) {
        size_t off = (b - 1) * blksize;
        size_t len = off + blksize <= (size_t)st.st_size ? blksize : st.st_size - off;
        pkt[0] = 0; pkt[1] = 3; pkt[2] = (b >> 8) & 0xff; pkt[3] = b & 0xff;
        memcpy(pkt + 4, data + off, len);
        send(s, pkt, len + 4, 0);
        if (recv(s, ack, sizeof ack, 0) < 4) break;
    }
    if (data) munmap(data, st.st_size);
    close(fd);
    close(s);
    (void)listener;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s ADDR ROOT\n", argv[0]); return 2; }
    int l = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(69) };
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    if (bind(l, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    for (;;) {
        unsigned char req[1024];
        struct sockaddr_in peer;
        socklen_t pl = sizeof peer;
        ssize_t n = recvfrom(l, req, sizeof req - 1, 0, (struct sockaddr *)&peer, &pl);
        if (n < 4 || req[1] != 1) continue;
        req[n] = 0;
        serve(l, argv[2], req, n, &peer);
    }
}
