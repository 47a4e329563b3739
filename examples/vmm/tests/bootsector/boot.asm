; iovirt-vmm test boot sector. SeaBIOS loads it at 0000:7C00 and jumps to it
; with DL = the boot drive. It talks to the disk through BIOS int 13h extended
; reads and writes (AH=42h/43h, disk address packet, LBA), reports BOOT-OK or
; "BOOT-FAIL <stage> <AH>" on the debug console (port 0x402, SeaBIOS's log) and
; resets the PC through the i8042 (command 0xFE), which ends iovirt-vmm with
; exit status 0.
;
; The test fills the disk so that 16-bit word k of the image holds k mod 65536
; (sector n, word j: n*256 + j); the boot sector itself is sector 0.
;
; Variants (nasm -f bin -D...):
;   (default)  read LBA 1..8 and check the pattern; write the inverted pattern
;              (~k) to LBA 16..23; clear the buffer, read them back and check.
;   READONLY   the write must fail (carry set) and LBA 16..23 must still hold k.
;   CDROM      2048-byte sectors: read 2 sectors at rd_lba (the test patches it
;              to the data file's LBA in the ISO) and check words 0, 1, 2, ...
;   BENCH      ITER reads of SECTORS sectors at LBA 1, then reset: through int 13h,
;              or with DMA through a tiny driver that programs the PIIX IDE bus
;              master itself (READ DMA, one PRD entry, waits for IRQ 14 with hlt).
;              The loop is framed by "TRAP-MARK start" / "TRAP-MARK end" lines,
;              which make iovirt-vmm --trap-stats snapshot its counters.

bits 16
org 0x7c00

%ifndef ITER
%define ITER 0
%endif
%ifndef SECTORS
%define SECTORS 8
%endif
%ifdef CDROM
%define WORDS_PER_SECTOR 1024
%define RD_COUNT 2
%else
%define WORDS_PER_SECTOR 256
%define RD_COUNT 8
%endif

BUF_SEG   equ 0x1000            ; transfer buffer at linear 0x10000
WR_LBA    equ 16
WR_COUNT  equ 8
DEBUGCON  equ 0x402
; Scratch variables in free low memory (not in the sector).
drive     equ 0x500
stage     equ 0x501
bm        equ 0x502             ; bus-master I/O base (DMA variant)
PRD       equ 0x0600            ; PRD table (DMA variant)
BDA_DISK_IRQ equ 0x48e          ; SeaBIOS's IRQ 14 handler sets this byte

start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
    cld
    mov [drive], dl
    mov si, msg_hello
    call print

%ifdef BENCH
  %ifdef DMA
    call dma_setup
  %endif
    mov si, msg_mark_start
    call print
    mov cx, ITER
.loop:
    jcxz .end
    push cx
  %ifdef DMA
    call dma_read
  %else
    mov word [dap.count], SECTORS
    mov dword [dap.lba], 1
    mov bl, 'r'
    mov ah, 0x42
    call disk
    jc fail
  %endif
    pop cx
    dec cx
    jmp .loop
.end:
    mov si, msg_mark_end
    call print
    jmp ok
%else
    ; Read and check the pattern.
    mov word [dap.count], RD_COUNT
    mov eax, [rd_lba]
    mov [dap.lba], eax
    mov bl, 'r'
    mov ah, 0x42
    call disk
    jc fail
    mov ax, [rd_seed]
    mov cx, RD_COUNT * WORDS_PER_SECTOR
    mov dx, 1
    mov bl, 'v'
    call verify
    jc fail
  %ifndef CDROM
    ; Write the inverted pattern to LBA 16..23.
    mov ax, ~(WR_LBA * 256) & 0xffff
    mov cx, WR_COUNT * 256
    mov dx, -1
    call fill
    mov word [dap.count], WR_COUNT
    mov dword [dap.lba], WR_LBA
    mov bl, 'w'
    mov ah, 0x43
    call disk
    %ifdef READONLY
    jnc fail                    ; stage 'w': the write succeeded on a read-only disk
    mov word [dap.count], WR_COUNT
    mov bl, 'R'
    mov ah, 0x42
    call disk
    jc fail
    mov ax, WR_LBA * 256        ; still the original pattern
    mov cx, WR_COUNT * 256
    mov dx, 1
    mov bl, 'u'
    call verify
    jc fail
    %else
    jc fail
    xor ax, ax                  ; clear the buffer, then read back
    mov cx, WR_COUNT * 256
    xor dx, dx
    call fill
    mov word [dap.count], WR_COUNT
    mov bl, 'b'
    mov ah, 0x42
    call disk
    jc fail
    mov ax, ~(WR_LBA * 256) & 0xffff
    mov cx, WR_COUNT * 256
    mov dx, -1
    mov bl, 'c'
    call verify
    jc fail
    %endif
  %endif
%endif

ok:
    mov si, msg_ok
    call print
reset:
    mov al, 0xfe
    out 0x64, al
.halt:
    hlt
    jmp .halt

; Print "BOOT-FAIL <stage> <AH in hex>" and reset.
fail:
    push ax
    mov si, msg_fail
    call print
    mov dx, DEBUGCON
    mov al, [stage]
    out dx, al
    mov al, ' '
    out dx, al
    pop ax
    mov al, ah
    shr al, 4
    call hexdigit
    mov al, ah
    call hexdigit
    mov al, 10
    out dx, al
    jmp reset

hexdigit:                       ; low nibble of AL to DEBUGCON
    and al, 0x0f
    add al, '0'
    cmp al, '9'
    jbe .d
    add al, 7
.d: out dx, al
    ret

; int 13h with the DAP: AH = 42h/43h, BL = stage name for a failure. CF as returned.
disk:
    mov [stage], bl
    mov si, dap
    mov dl, [drive]
    mov al, 0
    int 0x13
    ret

; Compare CX words at BUF_SEG:0 with AX, AX+DX, AX+2DX, ...; CF=1 on mismatch (stage BL).
verify:
    mov [stage], bl
    push es
    push word BUF_SEG
    pop es
    xor di, di
.v: cmp [es:di], ax
    jne .bad
    add ax, dx
    add di, 2
    loop .v
    pop es
    clc
    ret
.bad:
    pop es
    mov ah, 0xee
    stc
    ret

; Fill CX words at BUF_SEG:0 with AX, AX+DX, ...
fill:
    push es
    push word BUF_SEG
    pop es
    xor di, di
.f: stosw
    add ax, dx
    loop .f
    pop es
    ret

print:                          ; zero-terminated string at DS:SI to DEBUGCON
    mov dx, DEBUGCON
.p: lodsb
    test al, al
    jz .e
    out dx, al
    jmp .p
.e: ret

%ifdef DMA
; Find the bus-master base (BAR4 of 00:01.1), enable I/O decode and bus
; mastering, build a one-entry PRD table and let the drive interrupt (nIEN=0).
dma_setup:
    mov eax, 0x80000920
    mov dx, 0xcf8
    out dx, eax
    mov dx, 0xcfc
    in eax, dx
    and ax, 0xfffc
    mov [bm], ax
    mov eax, 0x80000904
    mov dx, 0xcf8
    out dx, eax
    mov dx, 0xcfc
    in ax, dx
    or ax, 5
    out dx, ax
    mov dword [PRD], 0x10000
    mov dword [PRD + 4], 0x80000000 | ((SECTORS * 512) & 0xffff)
    mov dx, 0x3f6
    mov al, 0x08
    out dx, al
    ret

; One READ DMA of SECTORS sectors at LBA 1 into 0x10000: 13 port accesses.
dma_read:
    mov byte [stage], 'D'
    mov dx, [bm]
    add dx, 4
    mov eax, PRD
    out dx, eax                 ; PRD table address
    mov dx, [bm]
    mov al, 0x08                ; direction: device to memory, stopped
    out dx, al
    mov dx, 0x1f6
    mov al, 0xe0                ; LBA, master, LBA[27:24] = 0
    out dx, al
    mov dx, 0x1f2
    mov al, SECTORS & 0xff
    out dx, al
    inc dx
    mov al, 1                   ; LBA[7:0]
    out dx, al
    inc dx
    xor al, al
    out dx, al                  ; LBA[15:8]
    inc dx
    out dx, al                  ; LBA[23:16]
    cli
    mov byte [BDA_DISK_IRQ], 0
    mov dx, 0x1f7
    mov al, 0xc8                ; READ DMA
    out dx, al
    mov dx, [bm]
    mov al, 0x09                ; start
    out dx, al
.wait:
    cmp byte [BDA_DISK_IRQ], 0
    jne .irq
    sti
    hlt                         ; IRQ 14 (or the timer) wakes us
    cli
    jmp .wait
.irq:
    sti
    mov dx, [bm]
    add dx, 2
    in al, dx                   ; bus-master status
    mov ah, al
    mov dx, [bm]
    xor al, al
    out dx, al                  ; stop
    mov dx, 0x1f7
    in al, dx                   ; ATA status (deasserts INTRQ)
    test al, 0x01
    jnz .err
    mov dx, [bm]
    add dx, 2
    mov al, 0x06
    out dx, al                  ; clear interrupt and error bits
    test ah, 0x02
    jnz .err
    ret
.err:
    jmp fail
%endif

msg_hello db "iovirt boot sector", 10, 0
msg_ok    db "BOOT-OK", 10, 0
msg_fail  db "BOOT-FAIL ", 0
%ifdef BENCH
msg_mark_start db "TRAP-MARK start", 10, 0
msg_mark_end   db "TRAP-MARK end", 10, 0
%endif

dap:      db 0x10, 0
.count:   dw 0
.off:     dw 0
.seg:     dw BUF_SEG
.lba:     dd 0, 0

    times 0x1f0 - ($ - $$) db 0
; Patched by the tests (CD: the data file's LBA): where to read, and the first word expected.
rd_lba    dd 1
rd_seed   dw 256
    times 510 - ($ - $$) db 0
    dw 0xaa55
