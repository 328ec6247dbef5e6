/*
 * vibatch's QEMU: the emulator libvirt starts for a job's VM (vm.emulator). It makes SIGUSR2
 * ignored and execs the real QEMU (VIBATCH_QEMU, fixed when etc/setup-node.sh builds this),
 * with the same arguments and that path as argv[0]; the pid stays the one libvirt forked.
 *
 * Why: Grid Engine's shepherd sends each signal it gives a job also to every process that
 * carries the job's additional group id (ENABLE_ADDGRP_KILL), and QEMU carries it so that the
 * VM is in the job's accounting (docs/batch/gridengine.md). With `qsub -notify` the shepherd
 * sends SIGUSR2 a while before it kills a job. QEMU 7.2 neither blocks nor catches SIGUSR2,
 * so that warning ended QEMU at once, and with it the VM the job's own SIGUSR2 trap should
 * have run in. libvirt sets every signal to its default before it execs the emulator, and an
 * ignored signal stays ignored across execve(2): this is the one place that can change it.
 * vibatch's forwarder, the job's own process, passes the SIGUSR2 on to the job in the guest.
 *
 * QEMU uses SIGUSR1 itself (blocked, or its vCPU kick under KVM), so that one is left alone.
 * Nothing is read from the environment or the arguments.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#ifndef VIBATCH_QEMU
#error "build with -DVIBATCH_QEMU='\"/usr/bin/qemu-system-x86_64\"'"
#endif

int main(int argc, char **argv)
{
    struct sigaction ign;
    char *alone[] = {(char *)VIBATCH_QEMU, NULL};

    memset(&ign, 0, sizeof(ign));
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    if (sigaction(SIGUSR2, &ign, NULL) != 0) {
        fprintf(stderr, "vibatch-qemu: sigaction(SIGUSR2): %s\n", strerror(errno));
        return 127;
    }
    if (argc < 1)
        argv = alone;
    argv[0] = (char *)VIBATCH_QEMU;   /* QEMU names itself by argv[0] in its messages */
    execv(VIBATCH_QEMU, argv);
    fprintf(stderr, "vibatch-qemu: cannot run %s: %s\n", VIBATCH_QEMU, strerror(errno));
    return 127;
}
