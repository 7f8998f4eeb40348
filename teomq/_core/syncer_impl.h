/* The durable store's syncer: one POSIX thread that runs fdatasync rounds and never touches
 * Python (so no GIL to take back after each sync). The loop hands it a round (file descriptors,
 * dup'd: the thread closes them) and learns that it ended from an eventfd it watches.
 * Used by seglog.pyx (Syncer). */
#ifndef TEOMQ_SYNCER_IMPL_H
#define TEOMQ_SYNCER_IMPL_H
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>


typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t th;
    int efd;                        /* the loop reads it: a round ended */
    int dirfd;
    int *fds;                       /* the submitted round's (malloc'd, handed to the thread) */
    int nfds;
    int dir;                        /* fsync the directory too (a new segment's entry) */
    int pending;
    int stop;
    int err;                        /* errno of the last round's first failure, or 0 */
    int running;
} teomq_syncer;

static void *teomq_syncer_main(void *arg) {
    teomq_syncer *s = (teomq_syncer *)arg;
    int *fds;
    for (;;) {
        int n, dir, i, err = 0;
        uint64_t one = 1;
        pthread_mutex_lock(&s->mu);
        while (!s->pending && !s->stop)
            pthread_cond_wait(&s->cv, &s->mu);
        if (!s->pending) {
            pthread_mutex_unlock(&s->mu);
            return NULL;
        }
        n = s->nfds;
        dir = s->dir;
        fds = s->fds;
        s->fds = NULL;
        s->pending = 0;
        pthread_mutex_unlock(&s->mu);
        for (i = 0; i < n; i++) {
            if (fdatasync(fds[i]) != 0 && !err)
                err = errno;
            close(fds[i]);
        }
        free(fds);
        if (dir && fsync(s->dirfd) != 0 && !err)
            err = errno;
        pthread_mutex_lock(&s->mu);
        s->err = err;
        pthread_mutex_unlock(&s->mu);
        while (write(s->efd, &one, sizeof(one)) < 0 && errno == EINTR) {
        }
    }
}

/* 0, or an errno */
static int teomq_syncer_start(teomq_syncer *s, int dirfd) {
    int rc;
    memset(s, 0, sizeof(*s));
    s->dirfd = dirfd;
    s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->efd < 0)
        return errno;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    rc = pthread_create(&s->th, NULL, teomq_syncer_main, s);
    if (rc != 0) {
        close(s->efd);
        s->efd = -1;
        return rc;
    }
    s->running = 1;
    return 0;
}

/* A round over fds[0..n) (the thread closes them); only when the previous one ended.
 * 0, or ENOMEM (then nothing was taken: the caller still owns the fds). */
static int teomq_syncer_submit(teomq_syncer *s, const int *fds, int n, int dir) {
    int *copy = (int *)malloc((size_t)(n ? n : 1) * sizeof(int));
    if (copy == NULL)
        return ENOMEM;
    memcpy(copy, fds, (size_t)n * sizeof(int));
    pthread_mutex_lock(&s->mu);
    free(s->fds);
    s->fds = copy;
    s->nfds = n;
    s->dir = dir;
    s->pending = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/* After the eventfd fired: the round's errno (0: all synced). */
static int teomq_syncer_result(teomq_syncer *s) {
    uint64_t v;
    int err;
    while (read(s->efd, &v, sizeof(v)) < 0 && errno == EINTR) {
    }
    pthread_mutex_lock(&s->mu);
    err = s->err;
    pthread_mutex_unlock(&s->mu);
    return err;
}

/* Finish a submitted round, then end the thread. */
static void teomq_syncer_stop(teomq_syncer *s) {
    if (!s->running)
        return;
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->th, NULL);
    s->running = 0;
    close(s->efd);
    s->efd = -1;
    free(s->fds);
    s->fds = NULL;
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
}
#endif
